"""Images: fetch from S3, decode with limits, crop to the encoder's input."""
