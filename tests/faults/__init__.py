"""The fault-injection suite (issue #16): real processes on 127.0.0.1, each fault injected at randomized
points, every loop bounded in count and time. Each module is marked slow (CI's second step) and reports
its faults through the `record_fault` fixture into reports/reliability.json (tests/reliability.py).
"""
