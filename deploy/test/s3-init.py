"""minio-init's stand-in: creates the bucket on the S3 server (idempotent). Moto accepts any
credentials, so there is no user or policy to create."""

import os
import time

import boto3
import botocore.exceptions

s3 = boto3.client("s3", endpoint_url=os.environ.get("S3_ENDPOINT", "http://minio:9000"))
bucket = os.environ["SLIMTRAIN_BUCKET"]
for _ in range(60):
    try:
        if bucket not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
            s3.create_bucket(Bucket=bucket)
        print(f"bucket {bucket} ready")
        break
    except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionClosedError):
        time.sleep(1)
else:
    raise SystemExit("the S3 server did not answer within 60 s")
