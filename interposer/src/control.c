/* The control channel: a Unix stream socket at $SWAPSERVE_INTERPOSER_SOCKET, served by one thread
 * of the library. One JSON object per line each way:
 *   {"op": "status"}            books, staging, capture problems, the last sleep and wake
 *   {"op": "prepare"}           pin the staging for the current books now (the first sleep is then fast)
 *   {"op": "sleep"}             sync, copy out, release the device memory (VA ranges kept)
 *   {"op": "wake"}              re-create, re-map at the same addresses, copy back
 *   {"op": "release_staging"}   free the pinned staging (awake only)
 * Every answer has "ok"; sleep and wake list their steps with seconds, and on failure the step
 * that failed and whether it was undone.
 *
 * Who may connect: the socket is created 0600 inside a directory that must be a 0700 directory
 * owned by the engine's user (created so when missing; refused otherwise), and every connection's
 * peer uid (SO_PEERCRED) must be the engine's own uid; anyone else gets one refusal line. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "swi.h"

#define SWI_MAX_LINE 4096

static char socket_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
static int listen_fd = -1;
static pid_t owner_pid;

const char *swi_control_socket_path(void) { return socket_path; }

static void write_all(int fd, const char *data, size_t len) {
    while (len > 0) {
        ssize_t n = send(fd, data, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return;
        data += n;
        len -= (size_t)n;
    }
}

static void answer(int fd, swi_buf *b) {
    swi_buf_printf(b, "\n");
    write_all(fd, b->data, b->len);
    b->len = 0;
}

/* the value of "op" in a one-line JSON object, or NULL */
static const char *parse_op(const char *line, char *op, size_t oplen) {
    const char *p = line;
    while (*p == ' ' || *p == '\t') p++;
    if (*p != '{') return NULL;
    const char *k = strstr(p, "\"op\"");
    if (!k) return NULL;
    k += 4;
    while (*k == ' ' || *k == '\t') k++;
    if (*k++ != ':') return NULL;
    while (*k == ' ' || *k == '\t') k++;
    if (*k++ != '"') return NULL;
    size_t n = 0;
    while (*k && *k != '"' && n + 1 < oplen) {
        if (!((*k >= 'a' && *k <= 'z') || *k == '_')) return NULL;
        op[n++] = *k++;
    }
    if (*k != '"') return NULL;
    op[n] = 0;
    return op;
}

static void handle_line(int fd, const char *line, swi_buf *b) {
    char op[32];
    if (!parse_op(line, op, sizeof op)) {
        swi_buf_printf(b, "{\"ok\":false,\"error\":\"bad request: one JSON object per line with \\\"op\\\" "
                          "(status, prepare, sleep, wake, release_staging)\"}");
    } else if (!strcmp(op, "status")) {
        swi_op_status(b);
    } else if (!strcmp(op, "sleep")) {
        swi_op_sleep(b);
    } else if (!strcmp(op, "wake")) {
        swi_op_wake(b);
    } else if (!strcmp(op, "prepare")) {
        swi_op_prepare(b);
    } else if (!strcmp(op, "release_staging")) {
        swi_op_release_staging(b);
    } else {
        swi_buf_printf(b, "{\"ok\":false,\"error\":\"unknown op '%s' (status, prepare, sleep, wake, release_staging)\"}",
                       op);
    }
    answer(fd, b);
}

static void serve_connection(int fd) {
    struct ucred peer;
    socklen_t len = sizeof peer;
    swi_buf b = {0};
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &peer, &len) != 0 || peer.uid != geteuid()) {
        /* take the request off the wire first (a second at most), so the refusal reaches a client
         * that writes before it reads; nothing of it is looked at */
        struct timeval brief = {1, 0};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &brief, sizeof brief);
        char discard[SWI_MAX_LINE];
        ssize_t got;
        while ((got = recv(fd, discard, sizeof discard, 0)) > 0 && !memchr(discard, '\n', (size_t)got)) {
        }
        swi_buf_printf(&b, "{\"ok\":false,\"error\":\"permission denied: only uid %d may control this engine\"}",
                       (int)geteuid());
        answer(fd, &b);
        swi_log(1, "refused a connection from uid %d (pid %d)", (int)peer.uid, (int)peer.pid);
        swi_buf_free(&b);
        return;
    }
    /* an idle connection is closed after a minute, so a stuck client cannot hold the channel */
    struct timeval tv = {60, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char line[SWI_MAX_LINE + 1];
    size_t have = 0;
    for (;;) {
        ssize_t n = recv(fd, line + have, SWI_MAX_LINE - have, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        have += (size_t)n;
        line[have] = 0;
        char *nl;
        while ((nl = memchr(line, '\n', have)) != NULL) {
            *nl = 0;
            handle_line(fd, line, &b);
            size_t used = (size_t)(nl - line) + 1;
            memmove(line, nl + 1, have - used);
            have -= used;
            line[have] = 0;
        }
        if (have == SWI_MAX_LINE) {
            swi_buf_printf(&b, "{\"ok\":false,\"error\":\"request line longer than %d bytes\"}", SWI_MAX_LINE);
            answer(fd, &b);
            break;
        }
    }
    swi_buf_free(&b);
}

static void *serve(void *arg) {
    (void)arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* the engine's signals stay the engine's */
    for (;;) {
        int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EINTR && errno != ECONNABORTED) usleep(100000);
            continue;
        }
        serve_connection(fd);
        close(fd);
    }
    return NULL;
}

__attribute__((destructor)) static void remove_socket(void) {
    if (listen_fd >= 0 && owner_pid == getpid()) unlink(socket_path);
}

/* the directory must keep everyone else out: a directory, ours, no group/other permissions
 * (statx: lstat got a new symbol version in glibc 2.33, statx exists since 2.28) */
static int directory_is_private(const char *dir) {
    struct statx st;
    if (statx(AT_FDCWD, dir, AT_SYMLINK_NOFOLLOW, STATX_TYPE | STATX_MODE | STATX_UID, &st) != 0) {
        if (errno != ENOENT || mkdir(dir, 0700) != 0 ||
            statx(AT_FDCWD, dir, AT_SYMLINK_NOFOLLOW, STATX_TYPE | STATX_MODE | STATX_UID, &st) != 0) {
            swi_log(0, "control socket directory %s: %s: not serving", dir, strerror(errno));
            return 0;
        }
    }
    if (!S_ISDIR(st.stx_mode) || st.stx_uid != geteuid() || (st.stx_mode & 077)) {
        swi_log(0,
                "control socket directory %s must be a directory owned by uid %d with mode 0700 "
                "(it is %s, uid %d, mode %03o): not serving",
                dir, (int)geteuid(), S_ISDIR(st.stx_mode) ? "a directory" : "not a directory", (int)st.stx_uid,
                (unsigned)(st.stx_mode & 0777));
        return 0;
    }
    return 1;
}

int swi_control_start(void) {
    const char *path = getenv("SWAPSERVE_INTERPOSER_SOCKET");
    if (!path || !*path) return 0;
    if (strlen(path) >= sizeof socket_path || path[0] != '/') {
        swi_log(0, "SWAPSERVE_INTERPOSER_SOCKET must be an absolute path shorter than %zu bytes: not serving",
                sizeof socket_path);
        return 0;
    }
    char dir[sizeof socket_path];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash == dir)
        dir[1] = 0;
    else
        *slash = 0;
    if (!directory_is_private(dir)) return 0;

    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return 0;
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        if (errno != EADDRINUSE) {
            swi_log(0, "bind %s: %s: not serving", path, strerror(errno));
            close(fd);
            return 0;
        }
        /* someone's socket is there: a live one is another process of this engine; a dead one is
         * left from an earlier run */
        int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        int live = probe >= 0 && connect(probe, (struct sockaddr *)&addr, sizeof addr) == 0;
        if (probe >= 0) close(probe);
        if (live) {
            swi_log(1, "%s is served by another process of this engine: this one passes its calls through", path);
            close(fd);
            return 0;
        }
        unlink(path);
        if (bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
            swi_log(0, "bind %s: %s: not serving", path, strerror(errno));
            close(fd);
            return 0;
        }
    }
    if (chmod(path, 0600) != 0 || listen(fd, 8) != 0) {
        swi_log(0, "listen %s: %s: not serving", path, strerror(errno));
        unlink(path);
        close(fd);
        return 0;
    }
    snprintf(socket_path, sizeof socket_path, "%s", path);
    listen_fd = fd;
    owner_pid = getpid();
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int rc = pthread_create(&thread, &attr, serve, NULL);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        swi_log(0, "cannot start the control thread: %s: not serving", strerror(rc));
        unlink(path);
        close(fd);
        listen_fd = -1;
        return 0;
    }
    swi_log(1, "capturing device allocations; control socket %s", path);
    return 1;
}
