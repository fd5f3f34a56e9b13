"""Initial sync through GET /v1/shape read by Python (urllib), chunk after chunk, not parsed:
the worker's and the transport's part without Node. Prints {"what":"raw_py","secs":..,"bytes":..}.
Usage: python3 bench/shape_raw.py URL TOKEN TABLE"""
import json, sys, time, urllib.parse, urllib.request

url, token, table = sys.argv[1:4]
started, offset, handle, size = time.time(), "-1", None, 0
while True:
    q = {"table": table, "offset": offset}
    if handle:
        q["handle"] = handle
    req = urllib.request.Request(f"{url}?{urllib.parse.urlencode(q)}",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req) as r:
        size += len(r.read())
        handle, offset = r.headers["electric-handle"], r.headers["electric-offset"]
        if r.headers.get("electric-up-to-date") is not None:
            break
print(json.dumps({"what": "raw_py", "secs": time.time() - started, "bytes": size}))
