"""The greenstalk side of beanstalk/examples/bench.rs: the same work, in Python.

Usage: greenstalk_bench.py HOST:PORT cycles|puts COUNT TUBE
Prints the rate per second.
"""
import sys
import time

import greenstalk


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    mode, count, tube = sys.argv[2], int(sys.argv[3]), sys.argv[4]
    body = b"g" * 1024
    with greenstalk.Client((host, int(port)), encoding=None, use=tube, watch=tube) as c:
        start = time.perf_counter()
        if mode == "cycles":
            for _ in range(count):
                c.put(body, priority=1024, ttr=120)
                job = c.reserve()
                c.delete(job)
        else:
            for _ in range(count):
                c.put(body, priority=1024, ttr=120)
        print(f"{count / (time.perf_counter() - start):.1f}")


if __name__ == "__main__":
    main()
