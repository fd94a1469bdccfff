/* A minimal client of the control socket for the tests' other users (who cannot run the test's
 * own Python): control_client SOCKET [REQUEST] prints the answer line, or {"connect_error": errno}. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    const char *req = argc > 2 ? argv[2] : "{\"op\": \"status\"}";
    struct sockaddr_un a;
    memset(&a, 0, sizeof a);
    a.sun_family = AF_UNIX;
    snprintf(a.sun_path, sizeof a.sun_path, "%s", argv[1]);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        printf("{\"connect_error\": %d}\n", errno);
        return 0;
    }
    char line[4200];
    int len = snprintf(line, sizeof line, "%s\n", req);
    (void)!send(fd, line, (size_t)len, MSG_NOSIGNAL); /* a refused peer may have closed already */
    char buf[65536];
    size_t have = 0;
    ssize_t n;
    while (have < sizeof buf - 1 && (n = read(fd, buf + have, sizeof buf - 1 - have)) > 0) {
        have += (size_t)n;
        if (memchr(buf, '\n', have)) break;
    }
    buf[have] = 0;
    fputs(buf, stdout);
    return 0;
}
