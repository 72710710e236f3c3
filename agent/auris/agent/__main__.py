from auris.agent.cli import main

raise SystemExit(main())
