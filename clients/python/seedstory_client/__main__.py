from seedstory_client.cli import main

main()
