from edge_sr.cli import main

main()
