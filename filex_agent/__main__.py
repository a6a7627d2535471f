from filex_agent.cli import main

raise SystemExit(main())
