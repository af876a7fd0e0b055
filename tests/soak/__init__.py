"""The combined-fault soak (`make soak`; a shorter one on each store in `make test`).

Three replicas behind deploy/nginx.conf, the S3 store (moto, or SeaweedFS: `--s3`, SOAK_S3)
behind a fault proxy, the Copernica simulator holding an account, a seeded load of requests of
mixed sizes with events (a third of them discovering the subject in up to three profiles and
subprofiles, some removed meanwhile, some with the e-mail data request refused "Invalid
method"), and a seeded schedule of faults (plan.py); then an invariant checker that reads only
S3 and the simulator (checker.py).
"""
