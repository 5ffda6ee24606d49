"""The generated stubs of the API ``seedstory.v1`` (``proto/seedstory/v1/story.proto`` in the project):
``story_pb2`` holds the messages, ``story_pb2_grpc`` the ``StoryServiceStub`` and the servicer hook the
server registers. Made by ``clients/python/generate_stubs.py``; never edit them by hand.
"""
