"""The fault-injection suite: every bad input or crash gives a clear message and loses nothing the user made.

- ``test_training_faults``: config typos, impossible batch settings, foreign or truncated checkpoints, unwritable
  output, a full disk, non-finite losses, SIGKILL during training and resume;
- ``test_data_faults``: an empty split, a missing image, a corrupt image (start-up checks and the decoding path);
- ``test_index_faults``: an index from another model, damaged index files, SIGKILL during index building;
- ``test_server_faults``: non-image, corrupt and oversized uploads, and a short load test of the server.
"""
