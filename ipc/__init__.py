"""Shared-memory IPC between API workers and the engine (never imports mlx).

Modules: `layout` (names, sizes, paths), `segments` (create / destroy / crash cleanup),
`ring` (SPSC frame ring, fence), `framing` (chunked messages, doorbell handshake),
`doorbell` (FIFO wake-ups), `control` (seqlock control block), `codec` (binary messages),
`channel` (EngineChannel, WorkerChannel), `messages` (the typed messages). See docs/ipc.md.
"""
