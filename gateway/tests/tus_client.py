"""Uploads a file to Vellum with the stock tus client (tuspy), as a user would.

Usage: tus_client.py ENDPOINT TOKEN FILE. Uploads two 64 KiB pieces, stops, then resumes
with a new client that asks the server for the offset and checksums every piece with
SHA-256. Prints a JSON report: where it stopped, where it resumed, the document id.
"""

import hashlib
import json
import os
import sys

from tusclient import client
from tusclient.uploader import Uploader

endpoint, token, path = sys.argv[1:4]
tus = client.TusClient(endpoint, headers={"Authorization": f"Bearer {token}"})
metadata = {"filename": os.path.basename(path), "filetype": "application/octet-stream"}

first = tus.uploader(path, chunk_size=65536, metadata=metadata)
first.upload(stop_at=2 * 65536)
stopped_at = first.offset


class Sha256Uploader(Uploader):
    CHECKSUM_ALGORITHM_PAIR = ("sha256", hashlib.sha256)


second = Sha256Uploader(path, client=tus, url=first.url, chunk_size=65536, upload_checksum=True)
resumed_from = second.offset
second.upload()
print(
    json.dumps(
        {
            "stoppedAt": stopped_at,
            "resumedFrom": resumed_from,
            "documentId": second.request.response_headers.get("vellum-document-id"),
        }
    )
)
