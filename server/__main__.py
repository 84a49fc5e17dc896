from improto.server.cli import main

raise SystemExit(main())
