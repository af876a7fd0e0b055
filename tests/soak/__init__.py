"""The combined-fault soak (`make soak`; 60 seconds of it in `make test`).

Three replicas behind deploy/nginx.conf, moto behind a fault proxy, the Copernica simulator,
a seeded load of requests of mixed sizes with events, and a seeded schedule of faults
(plan.py); then an invariant checker that reads only S3 and the simulator (checker.py).
"""
