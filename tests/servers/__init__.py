"""Real servers on 127.0.0.1 for the remote-read tests: nginx, a fault proxy, moto (S3), a token endpoint."""
