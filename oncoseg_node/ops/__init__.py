"""Running the node: service lifecycle, the worker, HTTP and jobs page, metrics, notify,
retention, QA snapshot, logs.

The top of the house: may import every stage. The worker lives here because
it is where the stages meet: it claims a job from the ledger, has
``contouring`` draw it, ``rtstruct`` write it and ``ops.qa`` picture it, and
queues its deliveries.
"""
