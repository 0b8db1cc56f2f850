"""Checks a finished job's objects in the bucket itself, not through the API: the job's
manifest.json lists every artifact with its size and sha256, each checkpoint folder has its own
manifest.json, and every object named must be there with exactly that content. Prints a JSON
summary; exits non-zero on any mismatch. Runs where boto3 reaches the S3 server (the test runs it
inside the S3 container):

    python verify_bucket.py BUCKET PREFIX JOB_ID [REQUIRED_NAME ...]
"""

import hashlib
import json
import os
import sys

import boto3


def main() -> int:
    bucket, prefix, job_id, *required = sys.argv[1:]
    s3 = boto3.client("s3", endpoint_url=os.environ.get("S3_ENDPOINT", "http://127.0.0.1:9000"))
    root = f"{prefix.strip('/')}/{job_id}/" if prefix.strip("/") else f"{job_id}/"
    keys = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=root):
        keys.update(o["Key"][len(root) :] for o in page.get("Contents", []))

    def read(name: str) -> bytes:
        return s3.get_object(Bucket=bucket, Key=root + name)["Body"].read()

    errors: list[str] = []

    def check(folder: str, manifest_name: str) -> int:
        files = json.loads(read(manifest_name))["files"]
        for name, entry in files.items():
            if folder + name not in keys:
                errors.append(f"{folder}{name}: listed in {manifest_name}, not in the bucket")
                continue
            data = read(folder + name)
            if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                errors.append(f"{folder}{name}: size or sha256 differs from {manifest_name}")
        return len(files)

    if "manifest.json" not in keys:
        print(f"no manifest.json under s3://{bucket}/{root}; objects: {sorted(keys)}", file=sys.stderr)
        return 1
    checked = check("", "manifest.json")
    for name in required:
        if name not in keys:
            errors.append(f"{name}: missing")
    checkpoint_manifests = sorted(
        k for k in keys if k.startswith("checkpoints/") and k.endswith("/manifest.json")
    )
    if not checkpoint_manifests:
        errors.append("no checkpoint with a manifest.json")
    for m in checkpoint_manifests:
        checked += check(m[: -len("manifest.json")], m)
    print(
        json.dumps(
            {
                "objects": len(keys),
                "verified": checked,
                "checkpoints": len(checkpoint_manifests),
                "errors": errors,
            }
        )
    )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
