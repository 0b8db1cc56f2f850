"""What runs on Ray: the job driver, the training loop, parallel strategies, compression, export."""
