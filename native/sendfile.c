// sendfile(2) for NAR bodies: file bytes from the page cache to a socket without passing
// through the agent's memory (agent/http/send-file.ts uses it; see there for the rules).
//
// Why hand-written: Node has no sendfile for sockets, there is no well-kept npm package for it,
// and libuv's uv_fs_sendfile (not reachable from JS anyway) does not do it for sockets: the
// libuv of Node 24 (src/unix/fs.c) tries copy_file_range first, which fails with EINVAL for a
// socket; only ENOSYS leads on to sendfile, and EINVAL goes to uv__fs_sendfile_emul, a read()
// into a buffer and write() loop that polls the socket: the user-space copy again, silently.
//
// Three ways in, as nginx does it (non-blocking sendfile on the event loop until the socket is
// full, then wait for writability) without ever blocking the event loop on a disk read:
//
// sendfileNow(outFd, inFd, offset, length) -> bytes sent, or -errno
//   On the calling (main) thread, and only bytes found in the page cache (resident()), 2 MiB at a time, up
//   to length (at most NOW_MAX): -ENODATA at once when the first of them are not, nothing sent,
//   and the caller uses sendfile() below. A partial count or -EAGAIN: the socket's buffer is
//   full, or (rarely) the bytes after those sent are not cached: the caller's next call tells.
//   0: the file ended early (it shrank). Not on Linux: always -ENODATA.
//
// sendfile(outFd, inFd, offset, length, [piece,] callback(err, bytesSent, pieceBytes))
//   Calls sendfile once on libuv's thread pool, where a read from disk may block. bytesSent may
//   be less than length: the socket's buffer is full (the caller waits for writability), or the
//   file ended early (0: it shrank). EAGAIN with nothing sent comes back as bytesSent 0 with
//   err.code "EAGAIN". Other failures: err with .code ("EPIPE", "ECONNRESET", ...). Platforms
//   without sendfile to sockets: ENOSYS.
//   With a Buffer `piece`: when the socket's buffer filled up, the file's next bytes (after
//   those sent, up to the piece's length and the region's end) are read into it on the same
//   pool thread; pieceBytes says how many (0 if none or the read failed).
//
// pollOpen(fd, callback(status, sent)) -> handle; pollStart(handle) -> 0 or a libuv error;
// pollStop(handle); pollClose(handle); pollSend(handle, inFd, offset, length) -> 0 or an error
//   A uv_poll_t for writability on the event loop: while started, the callback runs (status 0,
//   or a negative libuv error) whenever the socket can take bytes: no bytes moved, no thread
//   woken. One per region sent: started while the caller waits (epoll is level-triggered, so it
//   must be stopped while the socket is writable and nobody sends, e.g. during a pool call),
//   closed at the end. It watches a dup() of the socket: libuv allows one watcher per
//   descriptor, and its own stream watcher keeps the original (epoll keys its entries by
//   descriptor and file, so the two do not meet). pollClose (idempotent) closes the handle and
//   the dup with it; the caller closes it when the socket closes too: the dup would otherwise
//   hold the connection open, with nothing to wake the poll if the client never reads again.
//   pollSend is sendfileNow at every writability, here in C, without a trip to JS for each
//   ~1.6 MiB the socket takes: the callback runs once, with the bytes sent, when all `length`
//   are (status 0), or when the next bytes are not in the page cache (-ENODATA), the file
//   ended (0, fewer bytes) or sendfile failed (-errno); the poll is then stopped.

// Descriptors given to the pool and to the poll are dup()ed on the main thread and closed when
// done: if the socket is destroyed meanwhile, its number cannot be reused by another open() and
// receive NAR bytes while the pool thread still writes.
#define _GNU_SOURCE  // preadv2, RWF_NOWAIT
#define NAPI_VERSION 8
#include <node_api.h>

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#if defined(__linux__)
#include <sys/sendfile.h>
#include <sys/uio.h>
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
    case ENODATA: return "ENODATA";
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

// ---- sendfileNow: on the main thread, for bytes already in the page cache ----

// At most this much per sendfileNow call: more than a socket's buffer takes at once (loopback's
// grows to 4 MiB).
#define NOW_MAX ((int64_t)8 << 20)
#define NOW_CHUNK ((int64_t)2 << 20)

#if defined(__linux__)
// Between two probes: the kernel's default readahead window, so that a window still being read
// (its pages in the cache, not yet filled) holds at least one probe.
#define PROBE_STRIDE ((int64_t)128 << 10)

// Whether [off, off + len) of the file can be read without waiting for the disk: a one-byte
// preadv2(RWF_NOWAIT) every PROBE_STRIDE and at the last byte, each failing with EAGAIN at once
// for a page not in the page cache or still being read. Not cachestat(2) or mincore(2): for a
// file the process could not open for writing (the Nix store's, to the agent's own user)
// cachestat fails with EPERM on current kernels, and mincore reports every page as resident.
// A sample, not every page: a page evicted alone between two probes still costs the event loop
// one read (LRU eviction takes whole folios, often larger than a page). Anything unexpected
// counts as "not cached": the pool then does the work.
static bool resident(int fd, int64_t off, int64_t len) {
  char byte;
  struct iovec v = {&byte, 1};
  for (int64_t at = off;; at += PROBE_STRIDE) {
    if (at > off + len - 1) at = off + len - 1;
    ssize_t n;
    do {
      n = preadv2(fd, &v, 1, (off_t)at, RWF_NOWAIT);
    } while (n < 0 && errno == EINTR);
    if (n != 1) return false;
    if (at == off + len - 1) return true;
  }
}
#endif

enum stop { STOP_DONE, STOP_FULL, STOP_COLD, STOP_EOF, STOP_ERR };

// Sends bytes of [offset, offset + length) found in the page cache, 2 MiB at a time (so that
// checking costs in proportion to what the socket takes, about 1.6 MiB a call on loopback):
// returns the count sent and why it stopped (*err set for STOP_ERR).
// *checked (if given): bytes below it were found cached by an earlier call and are not probed
// again (the next call starts where the socket filled up, inside the last chunk probed).
static int64_t send_cached(int out_fd, int in_fd, int64_t offset, int64_t length, int64_t* checked, enum stop* why, int* err) {
  int64_t sent = 0;
  *why = STOP_DONE;
#if defined(__linux__)
  while (sent < length) {
    int64_t chunk = length - sent < NOW_CHUNK ? length - sent : NOW_CHUNK;
    int64_t from = offset + sent, to = from + chunk;
    if (checked != NULL && *checked > from) from = *checked < to ? *checked : to;
    if (from < to && !resident(in_fd, from, to - from)) {
      *why = STOP_COLD;
      break;
    }
    if (checked != NULL && to > *checked) *checked = to;
    // The socket is non-blocking (libuv's) and the file's pages are in memory: this returns
    // as soon as the socket's buffer is full, without waiting for anything.
    off_t off = (off_t)(offset + sent);
    ssize_t n;
    do {
      n = sendfile(out_fd, in_fd, &off, (size_t)chunk);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
      *why = errno == EAGAIN ? STOP_FULL : STOP_ERR;
      *err = errno;
      break;
    }
    sent += n;
    if (n == 0) {
      *why = STOP_EOF;
      break;
    }
    if (n < chunk) {
      *why = STOP_FULL;
      break;
    }
  }
#else
  (void)out_fd, (void)in_fd, (void)offset, (void)length, (void)checked, (void)err;
  *why = STOP_COLD;
#endif
  return sent;
}

static napi_value js_sendfile_now(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc != 4) THROW("sendfileNow(outFd, inFd, offset, length)");
  int32_t out_fd, in_fd;
  int64_t offset, length;
  if (napi_get_value_int32(env, argv[0], &out_fd) != napi_ok || out_fd < 0) THROW("bad outFd");
  if (napi_get_value_int32(env, argv[1], &in_fd) != napi_ok || in_fd < 0) THROW("bad inFd");
  if (napi_get_value_int64(env, argv[2], &offset) != napi_ok || offset < 0) THROW("bad offset");
  if (napi_get_value_int64(env, argv[3], &length) != napi_ok || length < 1) THROW("bad length");
  if (length > NOW_MAX) length = NOW_MAX;
  enum stop why;
  int err = 0;
  int64_t result = send_cached(out_fd, in_fd, offset, length, NULL, &why, &err);
  if (result == 0 && why == STOP_COLD) result = -ENODATA;
  else if (result == 0 && (why == STOP_FULL || why == STOP_ERR)) result = -err;
  napi_value out;
  napi_create_int64(env, result, &out);
  return out;
}

// ---- pollOpen / pollStart / pollStop / pollClose: a uv_poll_t on a dup of the socket ----

typedef struct {
  uv_poll_t poll;
  int fd;                // the dup, closed with the handle
  napi_env env;
  napi_ref callback;     // until closed
  bool started;
  bool closing;          // uv_close called
  bool closed;           // its callback ran: the memory is libuv's no more
  bool js_gone;          // the External was collected
  // pollSend: what is left to send at each writability, from a dup of the file.
  bool sending;
  int in_fd;
  int64_t off, left, sent;
  int64_t checked;  // bytes below this offset were found in the page cache (send_cached)
} Poll;

// One for all polls, their callbacks' async resource (the agent loads the addon in its main
// thread only).
static napi_async_context poll_context;

static void poll_free_if_done(Poll* w) {
  if (w->closed && w->js_gone) free(w);
}

static void poll_closed(uv_handle_t* h) {
  Poll* w = h->data;
  close(w->fd);
  if (w->sending) close(w->in_fd);
  w->closed = true;
  poll_free_if_done(w);
}

static void poll_close(Poll* w) {
  if (w->closing) return;
  w->closing = true;
  if (w->callback != NULL) {
    napi_delete_reference(w->env, w->callback);
    w->callback = NULL;
  }
  uv_close((uv_handle_t*)&w->poll, poll_closed);  // stops it too
}

static void poll_call(Poll* w, int status, int64_t sent) {
  napi_env env = w->env;
  napi_handle_scope scope;
  napi_open_handle_scope(env, &scope);
  napi_value cb, recv, argv[2];
  napi_get_reference_value(env, w->callback, &cb);
  napi_get_global(env, &recv);  // make_callback wants an object
  napi_create_int32(env, status, &argv[0]);
  napi_create_int64(env, sent, &argv[1]);
  // make_callback, not call_function: we are in a libuv callback, so the promise jobs this
  // callback queues must be run after it, as for any I/O callback.
  napi_make_callback(env, poll_context, recv, cb, 2, argv, NULL);
  napi_close_handle_scope(env, scope);
}

static void poll_ready(uv_poll_t* h, int status, int events) {
  (void)events;
  Poll* w = h->data;
  if (w->closing || w->callback == NULL) return;
  // An error stops libuv's watcher: said so to the caller, who closes or starts it again.
  if (status != 0) w->started = false;
  if (!w->sending) {
    poll_call(w, status, 0);
    return;
  }
  // pollSend: send what the socket takes now; call back only when done, or when the pool or
  // the caller must take over (bytes not cached, the file's end, an error).
  int err = 0;
  enum stop why = STOP_DONE;
  if (status == 0) {
    while (w->left > 0) {
      int64_t n = send_cached(w->fd, w->in_fd, w->off, w->left < NOW_MAX ? w->left : NOW_MAX, &w->checked, &why, &err);
      w->off += n;
      w->left -= n;
      w->sent += n;
      if (why != STOP_DONE) break;
    }
    if (why == STOP_FULL && w->left > 0) return;  // wait for the next writability
  }
  int result = status != 0 ? status : why == STOP_COLD ? -ENODATA : why == STOP_ERR ? -err : 0;
  w->sending = false;
  close(w->in_fd);
  if (w->started) {
    uv_poll_stop(&w->poll);
    w->started = false;
  }
  poll_call(w, result, w->sent);
}

static void poll_finalize(napi_env env, void* data, void* hint) {
  (void)env;
  (void)hint;
  Poll* w = data;
  w->js_gone = true;
  poll_close(w);  // no longer reachable from JS: nobody could close it
  poll_free_if_done(w);
}

static Poll* poll_arg(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  void* data = NULL;
  napi_valuetype t;
  if (argc != 1 || napi_typeof(env, argv[0], &t) != napi_ok || t != napi_external) return NULL;
  napi_get_value_external(env, argv[0], &data);
  return data;
}

static napi_value js_poll_open(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc != 2) THROW("pollOpen(fd, callback)");
  int32_t fd;
  napi_valuetype t;
  napi_typeof(env, argv[1], &t);
  if (t != napi_function) THROW("callback must be a function");
  if (napi_get_value_int32(env, argv[0], &fd) != napi_ok || fd < 0) THROW("bad fd");
  uv_loop_t* loop;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok) THROW("no event loop");
  Poll* w = calloc(1, sizeof(Poll));
  if (w == NULL) THROW("out of memory");
  w->env = env;
  w->fd = dup(fd);
  int r = w->fd < 0 ? -errno : uv_poll_init(loop, &w->poll, w->fd);
  if (r != 0) {
    if (w->fd >= 0) close(w->fd);
    free(w);
    int e = -r;  // libuv's errors are negative errno values on Unix
    napi_throw_error(env, code_of(e), strerror(e));
    return NULL;
  }
  w->poll.data = w;
  // The socket's own handle keeps the process alive while the client is served; this need not.
  uv_unref((uv_handle_t*)&w->poll);
  napi_create_reference(env, argv[1], 1, &w->callback);
  napi_value handle;
  napi_create_external(env, w, poll_finalize, NULL, &handle);
  return handle;
}

static napi_value js_poll_start(napi_env env, napi_callback_info info) {
  Poll* w = poll_arg(env, info);
  if (w == NULL) THROW("pollStart(handle)");
  int r = 0;
  if (!w->closing && !w->started) {
    r = uv_poll_start(&w->poll, UV_WRITABLE, poll_ready);
    w->started = r == 0;
  }
  napi_value out;
  napi_create_int32(env, w->closing ? UV_EBADF : r, &out);
  return out;
}

static napi_value js_poll_stop(napi_env env, napi_callback_info info) {
  Poll* w = poll_arg(env, info);
  if (w == NULL) THROW("pollStop(handle)");
  if (!w->closing && w->started) {
    uv_poll_stop(&w->poll);
    w->started = false;
  }
  return NULL;
}

static napi_value js_poll_send(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  void* data = NULL;
  napi_valuetype t;
  if (argc != 4 || napi_typeof(env, argv[0], &t) != napi_ok || t != napi_external) THROW("pollSend(handle, inFd, offset, length)");
  napi_get_value_external(env, argv[0], &data);
  Poll* w = data;
  int32_t in_fd;
  int64_t offset, length;
  if (napi_get_value_int32(env, argv[1], &in_fd) != napi_ok || in_fd < 0) THROW("bad inFd");
  if (napi_get_value_int64(env, argv[2], &offset) != napi_ok || offset < 0) THROW("bad offset");
  if (napi_get_value_int64(env, argv[3], &length) != napi_ok || length < 1) THROW("bad length");
  if (w->closing || w->sending) THROW("pollSend on a closed or busy poll");
  int r = 0;
  int fd = dup(in_fd);  // the caller may close its own while this runs
  if (fd < 0) r = -errno;
  else if (!w->started) {
    r = uv_poll_start(&w->poll, UV_WRITABLE, poll_ready);
    w->started = r == 0;
    if (r != 0) close(fd);
  }
  if (r == 0) {
    w->sending = true;
    w->in_fd = fd;
    w->off = offset;
    w->left = length;
    w->sent = 0;
    w->checked = offset;
  }
  napi_value out;
  napi_create_int32(env, r, &out);
  return out;
}

static napi_value js_poll_close(napi_env env, napi_callback_info info) {
  Poll* w = poll_arg(env, info);
  if (w == NULL) THROW("pollClose(handle)");
  poll_close(w);
  return NULL;
}

static void export_fn(napi_env env, napi_value exports, const char* name, napi_callback fn) {
  napi_value f;
  napi_create_function(env, name, NAPI_AUTO_LENGTH, fn, NULL, &f);
  napi_set_named_property(env, exports, name, f);
}

static napi_value init(napi_env env, napi_value exports) {
  napi_value fn;
  napi_create_function(env, "sendfile", NAPI_AUTO_LENGTH, js_sendfile, NULL, &fn);
  napi_set_named_property(env, exports, "sendfile", fn);
  export_fn(env, exports, "sendfileNow", js_sendfile_now);
  export_fn(env, exports, "pollOpen", js_poll_open);
  export_fn(env, exports, "pollStart", js_poll_start);
  export_fn(env, exports, "pollStop", js_poll_stop);
  export_fn(env, exports, "pollSend", js_poll_send);
  export_fn(env, exports, "pollClose", js_poll_close);
  napi_value resource, name;
  napi_create_object(env, &resource);
  napi_create_string_utf8(env, "fleetcache:writable", NAPI_AUTO_LENGTH, &name);
  napi_async_init(env, resource, name, &poll_context);
  napi_ref keep;  // held for good: the context does not hold its resource itself
  napi_create_reference(env, resource, 1, &keep);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
