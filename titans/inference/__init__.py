"""Using a trained model: decoding with its recurrent state (``generation``), and saving and
loading that state (``state_io``)."""
