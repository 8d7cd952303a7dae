"""The one exception type for a file minicvt was handed and cannot use.

Every reader (checkpoints and model files, Hugging Face folders, images, image folders and
their tar archives) refuses a broken or hostile file with a `BadFileError` whose message is
one line naming the file and the problem, before it allocates what the file merely claims
to hold. Each reader's own error type is a subclass, so a caller may catch either:

    try:
        model = minicvt.load(path)
    except minicvt.BadFileError as e:
        print(e)            # "runs/x/best.npz: array head.weight holds NaN (a diverged run's file?)"
"""


class BadFileError(ValueError):
    """A file (or folder) given to minicvt is missing, truncated, corrupt, hostile or of the
    wrong kind; the message is one line naming the file and the problem."""
