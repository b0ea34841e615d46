"""Errors a user can act on: each message says what was wrong and what to do."""


class HeadlabError(Exception):
    """Base class; the CLI prints the message on one line and exits with code 2."""


class UnknownModelError(HeadlabError):
    pass


class UnsupportedArchitectureError(HeadlabError):
    pass


class ModelFilesError(HeadlabError):
    pass


class PromptError(HeadlabError):
    pass


class InputError(HeadlabError):
    pass


class RunStoreError(HeadlabError):
    pass


class CacheFolderError(HeadlabError):
    """headlab's cache folder ($HEADLAB_HOME) is not a folder headlab can write."""
