from elite_cli.main import main

raise SystemExit(main())
