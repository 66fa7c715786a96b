{
  "targets": [
    {
      "target_name": "sendfile",
      "sources": ["native/sendfile.c"],
      "cflags": ["-O2", "-Wall", "-Wextra"]
    },
    {
      "target_name": "file_version",
      "sources": ["native/file-version.c"],
      "cflags": ["-O2", "-Wall", "-Wextra"]
    }
  ]
}
