"""The one error every part of the converter raises: the message names the checkpoint file and the key."""


class ConversionError(ValueError):
    """A released checkpoint cannot be read or converted; the message starts with the file (and key)."""
