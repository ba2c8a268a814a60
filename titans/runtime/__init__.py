"""The machine a process runs on: CPU allocator and bf16 kernels (``cpu``), resident memory
(``resident``)."""
