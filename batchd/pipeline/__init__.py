"""The pipeline: pending rows become batches (chunker, submitter), batches are
followed (poller) and their results written back (collector, outcomes)."""
