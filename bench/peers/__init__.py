"""The peers: other Python job queues driven through conveyor's throughput and latency workloads.

Imported by two interpreters: conveyor's venv runs the runner (`python -m bench.peers`), the peers'
own venv (bench/peers/.venv) runs one peer at a time (`python -m bench.peers.peer NAME ...`). So
nothing here imports conveyor, and nothing outside a peer's own module imports a peer.
"""
