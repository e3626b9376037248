"""Sorts `perf script -F comm,pid,tid,ip,sym` samples (stdin) into CPU microseconds
per operation, by process role and by category of the sampled function.

Usage: cpu-breakdown.py PIDS OPS_PER_SEC SECONDS HZ
PIDS: lines "0 <pid>" .. "3 <pid>" for the replicas, "clients <pid>" for the bench.
Samples are sorted by their leaf function (and, for the kernel, by the system call
on the stack); a storage thread's samples count as storage.
"""
import collections
import re
import sys

pids_file, ops, seconds, hz = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
roles = {}
for line in open(pids_file):
    name, *pid = line.split()
    if pid and pid[0].isdigit():
        roles[int(pid[0])] = "clients" if name == "clients" else ("primary" if name == "0" else "backups")


def kernel(frame):
    return frame.startswith("[k]")


def on_stack(stack, pattern):
    return any(re.search(pattern, frame) for frame in stack)


CATEGORIES = [
    ("idle (no process ran)", lambda comm, s: comm.startswith("swapper")),
    ("storage (redb, fsync)", lambda comm, s: "storage" in comm and not on_stack(s[:12], r"send_frame|tcp_")),
    ("Ed25519 (sign, verify)", lambda comm, s: re.search(r"curve25519|ed25519|sha2::|Sha512|zebra", s[0])),
    ("Noise (ChaCha20-Poly1305)", lambda comm, s: re.search(r"chacha|poly1305|snow", s[0])),
    ("BLAKE3 (MACs, digests)", lambda comm, s: "blake3" in s[0]),
    ("serialization", lambda comm, s: re.search(r"bincode|serde|postcard|codec", s[0])),
    ("allocation, copying", lambda comm, s: re.search(r"^mi_|_mi_|memmove|memcpy|memset|malloc|free|RawVec|clear_page", s[0])),
    ("kernel: TCP send (and loopback receive)", lambda comm, s: kernel(s[0]) and on_stack(s, r"tcp_sendmsg|__sys_sendto|sock_write_iter|tcp_write_xmit|__x64_sys_write")),
    ("kernel: TCP receive", lambda comm, s: kernel(s[0]) and on_stack(s, r"tcp_recvmsg|__sys_recvfrom|sock_read_iter|__x64_sys_read")),
    ("kernel: epoll, futex, scheduling", lambda comm, s: kernel(s[0]) and on_stack(s, r"epoll|futex|schedule|finish_task_switch")),
    ("kernel: other (interrupts, I/O, workers)", lambda comm, s: kernel(s[0])),
    ("tokio", lambda comm, s: "tokio" in s[0]),
    ("Diffuse's code", lambda comm, s: "diffuse" in s[0]),
    ("other user code", lambda comm, s: True),
]
COLUMNS = ["primary", "backups", "clients", "other"]
samples = collections.defaultdict(collections.Counter)


def account(sample):
    if sample is None:
        return
    (comm, pid), stack = sample
    role = roles.get(pid, "other")
    stack = stack or ["?"]
    for name, matches in CATEGORIES:
        if matches(comm, stack):
            samples[role][name] += 1
            return


current = None
for line in sys.stdin:
    if line.strip() and not line[0].isspace():
        account(current)
        header = re.match(r"(.*?)\s+(\d+)/(\d+)", line)
        current = ((header.group(1), int(header.group(2))), []) if header else None
    elif line.strip() and current is not None:
        address, _, symbol = line.strip().partition(" ")
        current[1].append(("[k]" if address.startswith("ffffffff") else "") + symbol)
account(current)


def per_op(count):
    return count / hz / seconds / ops * 1e6


print(f"{'µs of CPU per operation':42}" + "".join(f"{c:>9}" for c in COLUMNS) + f"{'all':>9}")
for name, _ in CATEGORIES:
    row = [samples[c][name] for c in COLUMNS]
    print(f"{name:42}" + "".join(f"{per_op(v):9.1f}" for v in row) + f"{per_op(sum(row)):9.1f}")
totals = [sum(samples[c].values()) for c in COLUMNS]
print(f"{'total':42}" + "".join(f"{per_op(v):9.1f}" for v in totals) + f"{per_op(sum(totals)):9.1f}")
