"""Running the node: service lifecycle, HTTP and jobs page, metrics, notify, retention, QA, logs.

The top of the house: may import every stage.
"""
