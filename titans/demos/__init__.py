"""The demonstrations behind ``titans demo``: needles in long haystacks through the shipped
checkpoints (``niah``), and key/value recall by an untrained memory layer (``recall``)."""
