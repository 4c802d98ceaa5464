"""Built-in training callbacks (:class:`core.interfaces.Callback`), selected by ``[callbacks.NAME]``
recipe tables: ``spectral``, the spectral monitor (:mod:`plugins.callbacks.spectral_monitor`)."""
