import socket, sys, threading, os
listen, upstream, outdir = sys.argv[1], sys.argv[2], sys.argv[3]
try: os.unlink(listen)
except FileNotFoundError: pass
srv = socket.socket(socket.AF_UNIX); srv.bind(listen); srv.listen(16)
n = 0
def pump(a, b, rec):
    try:
        while True:
            d = a.recv(65536)
            if not d: break
            if rec is not None: rec.append(d)
            b.sendall(d)
    except OSError: pass
    try: b.shutdown(socket.SHUT_WR)
    except OSError: pass
while True:
    c, _ = srv.accept()
    u = socket.socket(socket.AF_UNIX); u.connect(upstream)
    rec = []
    n += 1
    idx = n
    def run(c=c, u=u, rec=rec, idx=idx):
        t = threading.Thread(target=pump, args=(u, c, None)); t.start()
        pump(c, u, rec); t.join()
        open(f"{outdir}/client-{idx:03d}", "wb").write(b"".join(rec))
        c.close(); u.close()
    threading.Thread(target=run).start()
