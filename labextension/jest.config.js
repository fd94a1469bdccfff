/** Unit tests of the pure parts (formatting, state, DOM rendering); no JupyterLab imports needed. */
// clock times ("resets at 23:03:54") are the page's local time: the tests run in UTC, wherever they run
process.env.TZ = 'UTC';
module.exports = {
  testEnvironment: 'jsdom',
  roots: ['<rootDir>/src'],
  testRegex: 'src/__tests__/.*\\.spec\\.ts$',
  transform: {
    '^.+\\.ts$': ['ts-jest', { tsconfig: 'tsconfig.test.json' }]
  },
  moduleFileExtensions: ['ts', 'js', 'json']
};
