"""Drop-in adapters for code that already logs somewhere else.

* :mod:`kohakuboard.integrations.transformers`: ``KohakuBoardCallback`` for Hugging Face's ``Trainer``
* :mod:`kohakuboard.integrations.lightning`: ``KohakuBoardLogger`` for Lightning's ``Trainer``
* :mod:`kohakuboard.integrations.tensorboard`: ``SummaryWriter``, the ``torch.utils.tensorboard`` API
* :mod:`kohakuboard.integrations.tbimport`: ``kobo import tensorboard`` (event files to run folders)

Importing this package imports no framework: each submodule imports its own
framework when it is imported, and the frameworks are optional dependencies.
"""
