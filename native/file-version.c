// fstat(2) for the daemon backend's look at Nix's database files (agent/store/db-version.ts),
// without the Stats object Node's fstatSync builds. A narinfo hit with the daemon backend looks
// once per lookup (or once per event-loop turn, shared by concurrent lookups); in the agent's HTTP
// path fstatSync cost about 5 µs of CPU a look (the object,
// its fields, the garbage), a third of what separates that backend's hit from the database
// backend's (BENCHMARKS.md, "Daemon backend").
//
// fileVersion(fd, out)
//   fstat(fd) and writes into `out` (a Float64Array of at least 5): st_dev, st_ino, st_size,
//   st_mtime in milliseconds (with its fractional part), st_nlink. Returns 0, or the errno
//   (a positive number) when fstat failed; throws only for wrong arguments.
//   Synchronous: fstat of an open file does no I/O.
#define NAPI_VERSION 8
#include <node_api.h>

#include <errno.h>
#include <stdbool.h>
#include <sys/stat.h>

static napi_value file_version(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 2) {
    napi_throw_type_error(env, NULL, "fileVersion(fd, out) takes two arguments");
    return NULL;
  }
  int32_t fd;
  if (napi_get_value_int32(env, argv[0], &fd) != napi_ok) {
    napi_throw_type_error(env, NULL, "fd must be a number");
    return NULL;
  }
  bool is_typed = false;
  napi_is_typedarray(env, argv[1], &is_typed);
  napi_typedarray_type type;
  size_t length = 0;
  void* data = NULL;
  if (!is_typed || napi_get_typedarray_info(env, argv[1], &type, &length, &data, NULL, NULL) != napi_ok ||
      type != napi_float64_array || length < 5) {
    napi_throw_type_error(env, NULL, "out must be a Float64Array of at least 5");
    return NULL;
  }
  struct stat st;
  int err = fstat(fd, &st) == 0 ? 0 : errno;
  if (err == 0) {
    double* out = data;
    out[0] = (double)st.st_dev;
    out[1] = (double)st.st_ino;
    out[2] = (double)st.st_size;
#if defined(__APPLE__)
    out[3] = (double)st.st_mtimespec.tv_sec * 1e3 + (double)st.st_mtimespec.tv_nsec / 1e6;
#else
    out[3] = (double)st.st_mtim.tv_sec * 1e3 + (double)st.st_mtim.tv_nsec / 1e6;
#endif
    out[4] = (double)st.st_nlink;
  }
  napi_value result;
  napi_create_int32(env, err, &result);
  return result;
}

NAPI_MODULE_INIT() {
  napi_value fn;
  napi_create_function(env, "fileVersion", NAPI_AUTO_LENGTH, file_version, NULL, &fn);
  napi_set_named_property(env, exports, "fileVersion", fn);
  return exports;
}
