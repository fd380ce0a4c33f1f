"""batchd: runs large LLM workloads through the Message Batches API, durably."""
