from auris.collector.cli import main

raise SystemExit(main())
