from hf_dyntie.cli import main  # ``python -m hf_dyntie``: see hf_dyntie/cli.py (inspect, expand)

raise SystemExit(main())
