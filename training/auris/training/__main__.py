from auris.training.cli import main

raise SystemExit(main())
