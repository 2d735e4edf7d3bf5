/* app.c: a host program built against the installed libaamm with pkg-config. */
#include <stdio.h>
#include <string.h>

#include <aamm/aamm.h>
#include <aamm/change.h>

int main(void)
{
    char buf[AAMM_LSN_BUFSIZE];
    uint64_t lsn = 0;
    if (aamm_version_number() != AAMM_VERSION_NUMBER)
        return 1;
    if (aamm_lsn_parse("16/B374D848", &lsn) != 0 ||
        strcmp(aamm_lsn_format(lsn, buf), "16/B374D848") != 0)
        return 2;
    printf("installed libaamm %s works\n", aamm_version_string());
    return 0;
}
