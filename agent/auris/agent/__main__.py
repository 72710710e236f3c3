from auris.agent.launch import main

raise SystemExit(main())
