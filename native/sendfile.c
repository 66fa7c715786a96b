// sendfile(2) for NAR bodies: file bytes from the page cache to a socket without passing
// through the agent's memory (agent/http/send-file.ts uses it; see there for the rules).
//
// Why hand-written: Node has no sendfile for sockets, there is no well-kept npm package for it,
// and libuv's uv_fs_sendfile (not reachable from JS anyway) does not do it for sockets: the
// libuv of Node 24 (src/unix/fs.c) tries copy_file_range first, which fails with EINVAL for a
// socket; only ENOSYS leads on to sendfile, and EINVAL goes to uv__fs_sendfile_emul, a read()
// into a buffer and write() loop that polls the socket: the user-space copy again, silently.
// This is one call of sendfile(2), on libuv's thread pool, so a file that is not in the page
// cache never blocks the event loop.
//
// sendfile(outFd, inFd, offset, length, [piece,] callback(err, bytesSent, pieceBytes))
//   Calls sendfile once. bytesSent may be less than length: the socket's buffer is full (the
//   caller waits for writability), or the file ended early (0: it shrank). EAGAIN with nothing
//   sent comes back as bytesSent 0 with err.code "EAGAIN". Other failures: err with .code
//   ("EPIPE", "ECONNRESET", ...). Platforms without sendfile to sockets: ENOSYS.
//   With a Buffer `piece`: when the socket's buffer filled up, the file's next bytes (after
//   those sent, up to the piece's length and the region's end) are read into it on the same
//   pool thread; pieceBytes says how many (0 if none or the read failed).
//
// Both descriptors are dup()ed on the calling (main) thread and closed when the call is done:
// if the socket is destroyed meanwhile, its number cannot be reused by another open() and
// receive NAR bytes while the pool thread still writes.
#define NAPI_VERSION 8
#include <node_api.h>

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if defined(__linux__)
#include <sys/sendfile.h>
#elif defined(__APPLE__)
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#endif

typedef struct {
  napi_async_work work;
  napi_ref callback;
  int out_fd;
  int in_fd;
  int64_t offset;
  int64_t length;
  int64_t sent;
  int err;
  // Optional: where to read the bytes after those sent when the socket's buffer filled up, so
  // that the caller can write them the ordinary way without another trip to the thread pool.
  napi_ref piece_ref;
  char* piece;
  size_t piece_len;
  int64_t piece_read;
} Call;

static void execute(napi_env env, void* data) {
  (void)env;
  Call* c = data;
#if defined(__linux__)
  off_t off = (off_t)c->offset;
  ssize_t n;
  do {
    n = sendfile(c->out_fd, c->in_fd, &off, (size_t)c->length);
  } while (n < 0 && errno == EINTR);
  if (n < 0) c->err = errno;
  else c->sent = n;
#elif defined(__APPLE__)
  // macOS: sendfile(file, socket, offset, &len, headers, flags); len is in/out. On a
  // non-blocking socket a partial send returns -1 with EAGAIN and len set to what was sent.
  off_t len;
  int r;
  do {
    len = (off_t)c->length;
    r = sendfile(c->in_fd, c->out_fd, (off_t)c->offset, &len, NULL, 0);
  } while (r < 0 && errno == EINTR && len == 0);
  c->sent = len;
  // EAGAIN or EINTR after some bytes: a partial send, not a failure.
  if (r < 0 && len == 0) c->err = errno;
  else if (r < 0 && errno != EAGAIN && errno != EINTR) c->err = errno;
#else
  c->err = ENOSYS;
#endif
  // The socket is full (a partial count, or EAGAIN): read what the caller will write meanwhile.
  int full = (c->err == 0 && c->sent > 0 && c->sent < c->length) || (c->err == EAGAIN);
  if (c->piece != NULL && full) {
    int64_t want = c->length - c->sent;
    if (want > (int64_t)c->piece_len) want = (int64_t)c->piece_len;
    ssize_t r;
    do {
      r = pread(c->in_fd, c->piece, (size_t)want, (off_t)(c->offset + c->sent));
    } while (r < 0 && errno == EINTR);
    c->piece_read = r < 0 ? 0 : r;
  }
}

static const char* code_of(int err) {
  switch (err) {
    case EAGAIN: return "EAGAIN";
    case EPIPE: return "EPIPE";
    case ECONNRESET: return "ECONNRESET";
    case EBADF: return "EBADF";
    case EINVAL: return "EINVAL";
    case ENOSYS: return "ENOSYS";
    case ENOTSOCK: return "ENOTSOCK";
    case EIO: return "EIO";
    case ENOMEM: return "ENOMEM";
    case EOVERFLOW: return "EOVERFLOW";
    case EMFILE: return "EMFILE";
    case ENFILE: return "ENFILE";
    default: return "EUNKNOWN";
  }
}

static void complete(napi_env env, napi_status status, void* data) {
  Call* c = data;
  close(c->out_fd);
  close(c->in_fd);
  napi_value cb, global, argv[3];
  napi_get_reference_value(env, c->callback, &cb);
  napi_get_global(env, &global);
  if (status != napi_ok && c->err == 0) c->err = ECANCELED;
  if (c->err != 0) {
    napi_value code, msg;
    napi_create_string_utf8(env, code_of(c->err), NAPI_AUTO_LENGTH, &code);
    napi_create_string_utf8(env, strerror(c->err), NAPI_AUTO_LENGTH, &msg);
    napi_create_error(env, code, msg, &argv[0]);
    napi_value errno_v;
    napi_create_int32(env, -c->err, &errno_v);
    napi_set_named_property(env, argv[0], "errno", errno_v);
  } else {
    napi_get_null(env, &argv[0]);
  }
  napi_create_int64(env, c->sent, &argv[1]);
  napi_create_int64(env, c->piece_read, &argv[2]);
  if (c->piece_ref != NULL) napi_delete_reference(env, c->piece_ref);
  napi_delete_reference(env, c->callback);
  napi_delete_async_work(env, c->work);
  free(c);
  napi_call_function(env, global, cb, 3, argv, NULL);
}

#define THROW(msg)                            \
  do {                                        \
    napi_throw_type_error(env, NULL, (msg));  \
    return NULL;                              \
  } while (0)

static napi_value js_sendfile(napi_env env, napi_callback_info info) {
  size_t argc = 6;
  napi_value argv[6];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc != 5 && argc != 6) THROW("sendfile(outFd, inFd, offset, length, [piece,] callback)");
  napi_value callback = argv[argc - 1];
  int32_t out_fd, in_fd;
  int64_t offset, length;
  napi_valuetype t;
  napi_typeof(env, callback, &t);
  if (t != napi_function) THROW("callback must be a function");
  char* piece = NULL;
  size_t piece_len = 0;
  if (argc == 6) {
    bool is_buffer = false;
    napi_is_buffer(env, argv[4], &is_buffer);
    if (!is_buffer) THROW("piece must be a Buffer");
    napi_get_buffer_info(env, argv[4], (void**)&piece, &piece_len);
  }
  if (napi_get_value_int32(env, argv[0], &out_fd) != napi_ok || out_fd < 0) THROW("bad outFd");
  if (napi_get_value_int32(env, argv[1], &in_fd) != napi_ok || in_fd < 0) THROW("bad inFd");
  if (napi_get_value_int64(env, argv[2], &offset) != napi_ok || offset < 0) THROW("bad offset");
  if (napi_get_value_int64(env, argv[3], &length) != napi_ok || length < 1) THROW("bad length");

  Call* c = calloc(1, sizeof(Call));
  if (c == NULL) THROW("out of memory");
  c->offset = offset;
  c->length = length;
  c->out_fd = dup(out_fd);
  c->in_fd = c->out_fd < 0 ? -1 : dup(in_fd);
  if (c->in_fd < 0) {
    int e = errno;
    if (c->out_fd >= 0) close(c->out_fd);
    free(c);
    napi_throw_error(env, code_of(e), strerror(e));
    return NULL;
  }
  napi_value name;
  napi_create_string_utf8(env, "fleetcache:sendfile", NAPI_AUTO_LENGTH, &name);
  napi_create_reference(env, callback, 1, &c->callback);
  if (piece != NULL && piece_len > 0) {
    // Held until the call is done: the pool thread writes into it.
    napi_create_reference(env, argv[4], 1, &c->piece_ref);
    c->piece = piece;
    c->piece_len = piece_len;
  }
  napi_create_async_work(env, NULL, name, execute, complete, c, &c->work);
  napi_queue_async_work(env, c->work);
  return NULL;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_value fn;
  napi_create_function(env, "sendfile", NAPI_AUTO_LENGTH, js_sendfile, NULL, &fn);
  napi_set_named_property(env, exports, "sendfile", fn);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
