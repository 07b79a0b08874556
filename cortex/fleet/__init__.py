"""A fleet of hosts: what each host offers (inventory.py: declared in a hosts file, or read from
this machine) and which hosts run a spec's replicas (placement.py, pure like the planner it
builds on). No Prefect here."""
