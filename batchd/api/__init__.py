"""The Message Batches API: the client, its errors and retry policy, wire types,
response shapes, the results stream."""
