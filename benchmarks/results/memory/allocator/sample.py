"""Sample RSS of the newest python child running keras_run every 0.05 s."""
import os, sys, time, subprocess
out = open(sys.argv[1], "w")
seen = None
t0 = time.time()
while time.time() - t0 < 900:
    pids = subprocess.run(["pgrep", "-f", "keras_lora.bench"], capture_output=True, text=True).stdout.split()
    pids = [p for p in pids if p != str(os.getpid())]
    best = 0
    for p in pids:
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS"):
                    best = max(best, int(line.split()[1]))
        except OSError:
            pass
    out.write(f"{time.time()-t0:.2f} {best/2**20:.3f}\n"); out.flush()
    time.sleep(0.05)
