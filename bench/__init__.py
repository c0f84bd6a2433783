"""Reproducible conveyor workloads and the raw-SQL reference loops they are measured against."""
