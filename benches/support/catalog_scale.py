#!/usr/bin/env python3
"""The client side of benches/catalog_scale.sh: drives vstor's control API over its Unix socket
and appends figures to the run's results file (workload, side, round, metric, value).

  grow WORK PID DISKS STEP SIZE RESULTS          create d0..d{DISKS-1}; per step: ms per create,
                                                 RSS and state size per disk
  listed WORK PID DISKS STEP SIZE RESULTS T0      wait until GET /v1/disks lists DISKS disks;
                                                 restart seconds since T0
  shrink WORK PID DISKS STEP SIZE RESULTS         delete them all, newest first; ms per delete
"""

import json
import os
import socket
import sys
import time


def request(sock_path, method, path, body=None):
    payload = json.dumps(body).encode() if body is not None else b""
    head = (f"{method} {path} HTTP/1.1\r\nHost: vstor\r\nContent-Length: {len(payload)}\r\n"
            "Content-Type: application/json\r\nConnection: close\r\n\r\n")
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(sock_path)
        s.sendall(head.encode() + payload)
        chunks = []
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    reply = b"".join(chunks)
    status = int(reply.split(b" ", 2)[1])
    return status, reply.split(b"\r\n\r\n", 1)[-1]


def rss_kib(pid):
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    sys.exit(f"no VmRSS for pid {pid}")


def size_kib(path):
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total / 1024


def main():
    mode, work, pid, disks, step, size, results = sys.argv[1:8]
    pid, disks, step, size = int(pid), int(disks), int(step), int(size)
    api = os.path.join(work, "api.sock")
    state = os.path.join(work, "data", "state")
    out = open(results, "a", encoding="ascii")

    def record(workload, metric, value):
        out.write(f"{workload}\tvstor\t1\t{metric}\t{value}\n")
        out.flush()
        print(f"{workload:>14}  {metric} = {value:.3f}  (load {os.getloadavg()[0]:.2f})", file=sys.stderr)

    def steps():
        start = 0
        while start < disks:
            end = min(start + step, disks)
            yield start, end
            start = end

    if mode == "grow":
        base_rss, base_state = rss_kib(pid), size_kib(state)
        for start, end in steps():
            t = time.perf_counter()
            for i in range(start, end):
                status, body = request(api, "POST", "/v1/disks", {"name": f"d{i}", "size": size})
                if status != 201:
                    sys.exit(f"create d{i}: HTTP {status}: {body[:300]!r}")
            elapsed = time.perf_counter() - t
            workload = f"disks {start + 1}-{end}"
            record(workload, "create_ms", elapsed * 1000 / (end - start))
            record(workload, "rss_kib_per_disk", (rss_kib(pid) - base_rss) / end)
            record(workload, "state_kib_per_disk", (size_kib(state) - base_state) / end)
            record(workload, "rss_mib", rss_kib(pid) / 1024)
            record(workload, "state_mib", size_kib(state) / 1024)
    elif mode == "listed":
        t0 = float(sys.argv[8])
        while True:
            try:
                status, body = request(api, "GET", "/v1/disks")
                if status == 200 and len(json.loads(body)) == disks:
                    break
            except (ConnectionError, FileNotFoundError):
                pass
            time.sleep(0.01)
        record(f"restart at {disks}", "restart_s", time.time() - t0)
        record(f"restart at {disks}", "rss_mib", rss_kib(pid) / 1024)
        record(f"restart at {disks}", "state_mib", size_kib(state) / 1024)
    elif mode == "shrink":
        for start, end in reversed(list(steps())):
            t = time.perf_counter()
            for i in reversed(range(start, end)):
                status, body = request(api, "DELETE", f"/v1/disks/d{i}")
                if status not in (200, 204):
                    sys.exit(f"delete d{i}: HTTP {status}: {body[:300]!r}")
            elapsed = time.perf_counter() - t
            record(f"disks {start + 1}-{end}", "delete_ms", elapsed * 1000 / (end - start))
    else:
        sys.exit(f"unknown mode {mode}")


main()
