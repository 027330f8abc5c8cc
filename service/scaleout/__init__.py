"""Scale-out on Ray Serve: one ingress in front of replicas that each run the single-process engine.

Needs the `ray` extra (`pip install 'lokr-serve[ray]'`); nothing here imports Ray at package import.
"""
